"""The paper's maths, tensors in and out, no I/O, no process groups: advantage routing (SPEC 2), the
NFT loss (SPEC 3), gradient-surgery schedules (SPEC 4) and region-wise reweighting (SPEC 5)."""
