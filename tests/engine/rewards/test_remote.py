"""Rewards as a service (engine.rewards.wire, server, remote), against real servers on 127.0.0.1: remote
scores equal in-process ones bit for bit; batching across callers; timeouts, malformed answers, refused
tokens, unreachable and killed servers are one-line RewardErrors naming the reward and the URL (never a 0);
replicas share the load and cover for each other; bad requests are 4xx and the server goes on; config entries
with `url` are checked without connecting."""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError, RewardError
from engine.rewards import REGISTRY, AVAlign, RewardSpec, build_rewards, check_rewards, score_rewards, wire
from engine.rewards.base import check_video_grid
from engine.rewards.remote import RemoteReward
from tests.engine.rewards.reward_servers import (
    NonFinite,
    PromptLength,
    ServerProcess,
    Slow,
    ThreadServer,
    health,
    latent_rollout,
    media_rollout,
)

pytest.importorskip("aiohttp")
pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"retries": 1, "backoff": 0.01}  # client settings that keep failure tests quick


def one_line(error: pytest.ExceptionInfo, *words: str) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


def free_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, method: str = "POST", headers: dict | None = None) -> tuple[int, str]:
    """Status and text of a raw request."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# --- the wire format ---


def test_wire_round_trip_keeps_bits_and_sends_only_what_is_read():
    rollout = dataclasses.replace(media_rollout(3), video=media_rollout(3).video.bfloat16())
    everything = wire.decode_rollout(wire.encode_rollout(rollout, frozenset({"latents", "frames", "waveform", "text"})))
    for key in ("video", "audio", "frames", "waveforms"):
        sent, got = getattr(rollout, key), getattr(everything, key)
        assert got.dtype == sent.dtype and torch.equal(got, sent), key
    for key in ("video_grid", "fps", "geometry", "sample_rate", "prompts", "video_prompts", "audio_prompts"):
        assert getattr(everything, key) == getattr(rollout, key), key

    latents_only = wire.encode_rollout(rollout, frozenset({"latents"}))
    decoded = wire.decode_rollout(latents_only)
    assert decoded.frames is None and decoded.waveforms is None and decoded.prompts == ("", "", "")
    assert len(latents_only) < rollout.video.nbytes + rollout.audio.nbytes + 2000
    audio_only = wire.decode_rollout(wire.encode_rollout(rollout, frozenset({"waveform"})))
    assert audio_only.video.shape == (3, 2, 0) and audio_only.frames is None
    assert torch.equal(audio_only.waveforms, rollout.waveforms) and audio_only.sample_rate == 16000
    with pytest.raises(ValueError, match="reads frames"):
        wire.encode_rollout(latent_rollout(2), frozenset({"frames"}))


@pytest.mark.parametrize(
    "data, match",
    [
        (b"not safetensors", "not safetensors"),
        (save({"video": torch.zeros(1, 1, 1)}), "format None"),
        (save({"scores": torch.zeros(2)}, metadata={"format": wire.FORMAT, "version": "999"}), "version '999'"),
    ],
    ids=["garbage", "no-format", "other-version"],
)
def test_wire_refuses_what_it_cannot_read(data, match):
    with pytest.raises(ValueError, match=match):
        wire.decode_rollout(data)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("video_grid", "[7, 3, 5]", "malformed rollout.*video_grid"),  # the tokens no longer fit the grid
        ("geometry", '{"frame_stride": "8"}', "geometry must hold integers"),
        ("fps", '"fast"', "fps must be a number"),
        ("prompts", "[1, 2]", "prompts must be a list of strings"),
        ("audio_prompts", "not json", "audio_prompts is not JSON"),
    ],
)
def test_wire_refuses_a_rollout_with_inconsistent_fields(key, value, match):
    good = wire.encode_rollout(latent_rollout(2), frozenset({"latents", "text"}))
    header_size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_size])
    header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    with pytest.raises(ValueError, match=match):
        wire.decode_rollout(len(text).to_bytes(8, "little") + text + good[8 + header_size :])


def test_scores_wire_checks_shape_and_finiteness():
    assert torch.equal(wire.decode_scores(wire.encode_scores(torch.tensor([1.0, 2.0])), 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(3,\) floats"):
        wire.decode_scores(wire.encode_scores(torch.tensor([1.0, 2.0])), 3)
    with pytest.raises(ValueError, match="non-finite"):
        wire.decode_scores(wire.encode_scores(torch.tensor([1.0, float("inf")])), 2)


# --- scores through servers ---


@pytest.mark.parametrize("name", ["video_sharpness", "audio_steadiness", "av_sync", "av_align", "prompt_length"])
def test_remote_scores_equal_in_process_scores(name):
    local = PromptLength() if name == "prompt_length" else REGISTRY[name]()
    make = media_rollout if local.reads & {"frames", "waveform"} else latent_rollout
    with ThreadServer(local) as server:
        remote = RemoteReward(name, server.url)
        assert (remote.modality, remote.reads, remote.remote, local.remote) == (
            local.modality,
            local.reads,
            True,
            False,
        )
        for n, seed in ((1, 0), (5, 1), (40, 2)):  # 40 > max_batch: scored in chunks of 32
            rollout = make(n, seed=seed)
            expected = score_rewards([local], rollout)[name]
            got = score_rewards([remote], rollout)[name]
            assert got.dtype == torch.float32 and torch.equal(got, expected), (n, got, expected)
        assert health(server.url)["samples"] == 46


def test_requests_from_many_callers_are_batched():
    reward = REGISTRY["av_sync"]()
    rollouts = [latent_rollout(2, seed=i) for i in range(6)] + [latent_rollout(2, grid=(4, 2, 2), seed=9)]
    # A batch closes when its 14 samples are in (or after 5 s): one batch, scored in two groups (two grids).
    with ThreadServer(reward, max_wait_ms=5000, max_batch=14) as server:
        remote = RemoteReward("av_sync", server.url, concurrency=8)
        with ThreadPoolExecutor(len(rollouts)) as pool:
            scores = list(pool.map(remote.score, rollouts))
        counts = health(server.url)
    for rollout, got in zip(rollouts, scores):
        assert torch.allclose(got, reward.score(rollout), atol=1e-6)
    assert (counts["requests"], counts["samples"], counts["batches"]) == (7, 14, 2)


def test_two_replicas_share_the_load_and_cover_for_each_other(caplog):
    reward = REGISTRY["audio_steadiness"]()
    rollout = latent_rollout(3)
    with ThreadServer(reward) as a, ThreadServer(reward) as b:
        remote = RemoteReward("audio_steadiness", [a.url, b.url], **FAST)
        for _ in range(6):
            assert torch.equal(remote.score(rollout), reward.score(rollout))
        assert health(a.url)["requests"] == health(b.url)["requests"] == 3  # idle replicas: round robin
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(remote.score, [rollout] * 8))
        served = health(a.url)["requests"]
        assert served > 3 and health(b.url)["requests"] > 3 and served + health(b.url)["requests"] == 14
        b.stop()  # a failed replica's retry goes to the other, and the dead one is passed over from then on
        with caplog.at_level("WARNING", logger="engine.rewards.remote"):
            for _ in range(4):
                assert torch.equal(remote.score(rollout), reward.score(rollout))
        assert health(a.url)["requests"] == served + 4
        (retry,) = caplog.messages
        assert b.url in retry and "ConnectionRefusedError" in retry and "retry 1 of 1" in retry


def test_concurrency_bounds_requests_in_flight():
    gate = threading.Event()
    with ThreadServer(Slow(seconds=5, gate=gate), max_wait_ms=0) as server:
        remote = RemoteReward("slow", server.url, concurrency=2)
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(remote.score, latent_rollout(1, seed=i)) for i in range(5)]

            def in_flight() -> int:
                return sum(r.in_flight for r in remote._replicas)

            deadline = time.monotonic() + 10
            while in_flight() < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.2)  # time for the other three to be sent, if the client let them
            most = in_flight()
            gate.set()
            scores = [f.result() for f in futures]
    assert most == 2
    assert [float(x) for x in torch.cat(scores)] == [float(Slow().score(latent_rollout(1, seed=i))) for i in range(5)]


# --- failures: one line naming the reward and the URL, never a 0 ---


def test_an_unreachable_server_fails_at_start_in_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardError) as error:
        build_rewards([RewardSpec(name="clap", url=url, retries=0)])
    one_line(error, "reward 'clap'", url, "unreachable", "ConnectionRefusedError")


def test_a_slow_server_is_a_timeout_error():
    gate = threading.Event()
    with ThreadServer(Slow(seconds=10, gate=gate)) as server:
        remote = RemoteReward("slow", server.url, timeout=0.3, **FAST)
        start = time.monotonic()
        with pytest.raises(RewardError) as error:
            remote.score(latent_rollout(2))
        elapsed = time.monotonic() - start
        gate.set()
    one_line(error, "reward 'slow'", server.url, "failed 2 times", "no answer within 0.3 s (timeout)")
    assert elapsed < 2


class _Fake(BaseHTTPRequestHandler):
    """A server that claims to be a reward server and answers /score with `body` (a class attribute)."""

    info = {"name": "av_sync", "modality": "av", "reads": ["latents"], "wire": wire.VERSION}
    body = b""
    posts = 0

    def do_GET(self):
        self._answer(200, json.dumps(self.info).encode())

    def do_POST(self):
        type(self).posts += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(200, self.body)

    def _answer(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    "body, words",
    [
        (b"<html>oops</html>", ["not safetensors"]),
        (
            save({"score": torch.zeros(2)}, metadata={"format": wire.FORMAT, "version": str(wire.VERSION)}),
            ["no 'scores'"],
        ),
        (wire.encode_scores(torch.zeros(3)), ["(2,) floats, got (3,)"]),
        (wire.encode_scores(torch.tensor([0.5, float("nan")])), ["non-finite"]),
    ],
    ids=["html", "no-scores", "wrong-shape", "nan"],
)
def test_malformed_answers_are_errors_naming_the_reward(fake, monkeypatch, body, words):
    httpd, url = fake
    monkeypatch.setattr(_Fake, "body", body)
    monkeypatch.setattr(_Fake, "posts", 0)
    remote = RemoteReward("av_sync", url, **FAST)
    with pytest.raises(RewardError) as error:
        remote.score(latent_rollout(2))
    one_line(error, "reward 'av_sync'", f"malformed answer from {url}", *words)
    assert _Fake.posts == 1  # not retried: a retry would get the same


def test_what_is_not_a_reward_server_or_disagrees_fails_at_start(fake, monkeypatch):
    _, url = fake
    monkeypatch.setattr(_Fake, "info", {"hello": "world"})
    with pytest.raises(RewardError) as error:
        RemoteReward("av_sync", url)
    one_line(error, "reward 'av_sync'", url, "is not an omninft reward server")
    monkeypatch.setattr(_Fake, "info", {"name": "clap", "modality": "audio", "reads": ["waveform"], "wire": 1})
    with pytest.raises(RewardError) as error:
        RemoteReward("av_sync", url)  # a built-in name: the server must judge the same modality
    one_line(error, "serves 'clap' of modality 'audio'", "built-in 'av_sync' is 'av'")
    monkeypatch.setattr(_Fake, "info", {**_Fake.info, "wire": 99})
    with pytest.raises(RewardError) as error:
        RemoteReward("my_judge", url)
    one_line(error, "speaks wire format 99")
    with ThreadServer(REGISTRY["audio_steadiness"]()) as other:
        monkeypatch.setattr(_Fake, "info", {**_Fake.info, "wire": 1})
        with pytest.raises(RewardError) as error:
            RemoteReward("my_judge", [url, other.url])
        one_line(error, "replicas disagree", url, other.url)


def test_bad_requests_are_4xx_and_the_server_goes_on():
    with ThreadServer(AVAlign()) as server:
        assert post(f"{server.url}/score", b"garbage")[0] == 400
        latents_only = wire.encode_rollout(media_rollout(2), frozenset({"latents"}))
        status, text = post(f"{server.url}/score", latents_only)
        assert status == 400 and "reads frames and waveform" in text
        too_small = dataclasses.replace(media_rollout(2), video=torch.zeros(2, 1, 16), video_grid=(1, 1, 1))
        status, text = post(f"{server.url}/score", wire.encode_rollout(too_small, AVAlign.reads))
        assert status == 400 and "at least [2, 1, 1]" in text
        empty = wire.encode_rollout(media_rollout(2).head(0), frozenset({"latents"}))
        assert post(f"{server.url}/score", empty) == (400, "the rollout has no samples")
        assert post(f"{server.url}/score", b"", method="GET")[0] == 405
        assert post(f"{server.url}/nothing", b"", method="GET")[0] == 404
        remote = RemoteReward("av_align", server.url)
        assert torch.equal(remote.score(media_rollout(2)), AVAlign().score(media_rollout(2)))
        assert remote.score(latent_rollout(0)).shape == (0,)  # nothing to ask
        with pytest.raises(RewardError) as error:
            remote.score(latent_rollout(2))  # no media: refused before anything is sent
        one_line(error, "reward 'av_align'", "reads frames")
    with ThreadServer(AVAlign(), max_request_mb=0.01) as server:
        status, _ = post(f"{server.url}/score", wire.encode_rollout(media_rollout(2), AVAlign.reads))
        assert status == 413


def test_a_failing_reward_is_a_500_with_its_message_and_the_server_goes_on():
    with ThreadServer(NonFinite()) as server:
        status, text = post(f"{server.url}/score", wire.encode_rollout(latent_rollout(2), NonFinite.reads))
        assert status == 500 and "reward 'non_finite' returned non-finite scores" in text
        remote = RemoteReward("non_finite", server.url, **FAST)
        with pytest.raises(RewardError) as error:
            remote.score(latent_rollout(2))
        one_line(error, "reward 'non_finite'", server.url, "failed 2 times", "HTTP 500", "non-finite")
        assert health(server.url)["status"] == "ok"


def test_the_token_is_required_where_the_server_has_one(monkeypatch):
    with ThreadServer(REGISTRY["av_sync"](), token="s3cret") as server:
        assert health(server.url)["status"] == "ok"  # the liveness probe needs no token
        assert post(f"{server.url}/info", b"", method="GET")[0] == 401
        status, _ = post(f"{server.url}/score", b"x", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        for token in (None, "wrong"):
            with pytest.raises(RewardError) as error:
                RemoteReward("av_sync", server.url, token=token)
            one_line(error, "reward 'av_sync'", server.url, "refused the token (HTTP 401")
        spec = RewardSpec(name="av_sync", url=server.url, token_env="OMNINFT_TEST_TOKEN")
        with pytest.raises(RewardError) as error:
            build_rewards([spec])
        one_line(error, "token_env OMNINFT_TEST_TOKEN is not set")
        monkeypatch.setenv("OMNINFT_TEST_TOKEN", "s3cret")
        (remote,) = build_rewards([spec])
        assert torch.equal(remote.score(latent_rollout(2)), REGISTRY["av_sync"]().score(latent_rollout(2)))


def test_the_cli_server_serves_and_a_killed_one_is_a_clear_error(tmp_path):
    started = tmp_path / "started"
    args = ["--class", "tests.engine.rewards.reward_servers:Slow", "seconds=1.5", f"started={started}"]
    with ServerProcess([*args, "--token-env", "OMNINFT_TEST_TOKEN"], tmp_path, {"OMNINFT_TEST_TOKEN": "t"}) as server:
        assert f"omninft reward-server: slow on {server.url}" in server.output()
        remote = RemoteReward("slow", server.url, token="t", **FAST)
        rollout = latent_rollout(2)
        with ThreadPoolExecutor(1) as pool:
            scoring = pool.submit(remote.score, rollout)
            while not started.exists():
                time.sleep(0.02)
            server.kill()  # mid-scoring
            with pytest.raises(RewardError) as error:
                scoring.result(timeout=30)
    one_line(error, "reward 'slow'", server.url, "failed 2 times", "ConnectionRefusedError")


def test_sigterm_answers_what_is_in_flight_and_exits_cleanly(tmp_path):
    started = tmp_path / "started"
    args = ["--class", "tests.engine.rewards.reward_servers:Slow", "seconds=1", f"started={started}"]
    with ServerProcess(args, tmp_path) as server:
        remote = RemoteReward("slow", server.url)
        with ThreadPoolExecutor(1) as pool:
            scoring = pool.submit(remote.score, latent_rollout(2))
            while not started.exists():
                time.sleep(0.02)
            assert server.stop() == 0
            assert torch.equal(scoring.result(timeout=30), Slow().score(latent_rollout(2)))


def test_reward_server_cli_errors_are_one_line(capsys, monkeypatch):
    assert main(["reward-server", "--reward", "no_such_reward", "--port", "0"]) == 2
    assert "rewards[0].name 'no_such_reward' is unknown" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "av_sync", "--port", "0", "--token-env", "OMNINFT_UNSET_VAR"]) == 2
    assert "OMNINFT_UNSET_VAR: the environment variable is not set" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "av_sync", "--port", "0", "--max-batch", "0"]) == 2
    assert "--max-batch >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # the serve extra not installed
    assert main(["reward-server", "--reward", "av_sync", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs aiohttp" in err and '".[serve]"' in err


# --- config entries with url: checked without connecting ---


def test_remote_entries_are_read_and_checked_without_connecting():
    unreachable = "http://judge.invalid:8500"
    cfg = load_config(
        None,
        [
            f"rewards=[{{name: clap, url: {unreachable}, timeout: 5, retries: 0, token_env: CLAP_TOKEN}},"
            f" {{name: my_judge, url: [{unreachable}, 'http://judge2.invalid:8500/prefix'], on_failure: skip}},"
            " {name: av_sync, weight: 2}]"
        ],
    )
    clap, judge, local = cfg.rewards
    assert (clap.url, clap.timeout, clap.retries, clap.concurrency, clap.token_env) == (
        unreachable,
        5.0,
        0,
        4,
        "CLAP_TOKEN",
    )
    assert judge.url == [unreachable, "http://judge2.invalid:8500/prefix"] and judge.on_failure == "skip"
    check_video_grid(cfg.rewards[:2], [1, 1, 1])  # remote rewards: the server checks the grid
    (built,) = build_rewards([RewardSpec(name="av_sync", on_failure="skip")])
    assert built.on_failure == "skip" and built.remote is False


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"name": "clap", "url": "http://j:1", "args": {"path": "/w"}}, ["rewards[0]", "built by its server"]),
        ({"cls": "a.b:C", "url": "http://j:1"}, ["rewards[0]", "needs a name"]),
        ({"name": "j", "url": "judge:8500"}, ["rewards[0].url 'judge:8500'", "http://host:port"]),
        ({"name": "j", "url": "http://j:port"}, ["rewards[0].url"]),
        ({"name": "j", "url": []}, ["non-empty list"]),
        ({"name": "j", "url": ["http://j:1", "http://j:1"]}, ["lists a replica twice"]),
        ({"name": "j", "url": "http://j:1", "timeout": 0}, ["rewards[0].timeout", "> 0"]),
        ({"name": "j", "url": "http://j:1", "retries": -1}, ["rewards[0].retries must be >= 0"]),
        ({"name": "j", "url": "http://j:1", "concurrency": 0}, ["rewards[0].concurrency must be >= 1"]),
        ({"name": "j", "url": "http://j:1", "token_env": "A=b"}, ["token_env must name an environment variable"]),
        ({"name": "av_sync", "on_failure": "zero"}, ["rewards[0].on_failure must be one of stop, skip"]),
        ({"name": "j", "url": "http://j:1", "weight": -1}, ["rewards[0].weight"]),
    ],
)
def test_bad_remote_entries_are_config_errors(entry, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["rewards=" + json.dumps([entry])])
    one_line(error, *words)


def test_a_remote_and_a_local_reward_of_one_name_are_duplicates():
    with pytest.raises(ConfigError, match="'av_sync' is a duplicate"):
        check_rewards([RewardSpec(name="av_sync"), RewardSpec(name="av_sync", url="http://j:1")])
