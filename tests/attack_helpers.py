"""A small attack run for the attack tests: UCE fitted for "circle", then ``attack`` on it."""

from erasekit.evaluation.attacks import attack
from erasekit.methods import uce
from erasekit.methods.uce import UCEConfig


def attack_uce_circle(pipe, out, attacks, **kw):
    """``attack(pipe, "toy-objects", "circle", edits=[UCE edit], out, attacks, n=2, ...)``: results."""
    edit = uce.fit(pipe, "circle", UCEConfig(), progress=False)
    args = dict(n=2, batch_size=8, suite_options={"n": 2, "n_locality": 1}, progress=False) | kw
    return attack(pipe, "toy-objects", "circle", edits=[edit], out=out, attacks=attacks, **args)
