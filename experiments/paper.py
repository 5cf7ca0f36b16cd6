"""The paper's reported numbers the experiments compare against (relative CARVE vs GDN-2, exponents)."""

PAPER = {"params": -0.19, "memory": -0.13, "time": +0.004, "perturbation_exponent": -0.5, "wikitext_ppl_delta": -0.18}
