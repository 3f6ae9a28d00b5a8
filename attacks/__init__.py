"""Attacks as plain functions, BPDA/EOT wrappers, the audit runner, metrics and the report.

Every attack shares one shape, ``attack(model, inputs, labels, *, targeted=False, **hyper)``;
the registry names them with their kind (budget or minimal) and defaults::

    from advshield.attacks import pgd, ddn, bp
    adv = pgd(model, x, y, eps=8 / 255, steps=40)

Modules: ``gradient`` (FGSM, BIM, PGD, APGD, APGD-T: one loop), ``carlini_wagner``, ``deepfool``,
``decoupled_direction_norm`` (DDN), ``boundary_projection`` (BP, thesis ch. 5), ``smooth`` (sC&W,
qPGD2: smooth adversarial examples, thesis ch. 4) with ``laplacian`` (its smoothing), ``transfer``,
``adaptive`` (BPDA/EOT/detector-aware attack models), ``detector_attacks`` (orthogonal PGD
and the combined-loss sweep against a detector), ``threat`` (the never-trust check),
``primitives`` (norms, losses, gradient counting), ``audit`` (spec, records, runner, probes),
``audit_pipeline`` (the whole audit in one call), ``certify``, ``metrics``, ``masking``, ``gate``,
``report``.
"""

from advshield.attacks.adaptive import AttackModel, attack_model
from advshield.attacks.boundary_projection import bp
from advshield.attacks.carlini_wagner import cw_l2
from advshield.attacks.decoupled_direction_norm import ddn
from advshield.attacks.deepfool import deepfool
from advshield.attacks.detector_attacks import detector_sweep, opgd
from advshield.attacks.gradient import apgd, apgd_t, bim, fgsm, pgd
from advshield.attacks.registry import ATTACKS, AttackSpec, get_attack, register_attack, run_attack
from advshield.attacks.smooth import qpgd2, qpgd_l2, scw_l2
from advshield.attacks.transfer import transfer_attack

__all__ = [
    "ATTACKS",
    "AttackModel",
    "AttackSpec",
    "apgd",
    "apgd_t",
    "attack_model",
    "bim",
    "bp",
    "cw_l2",
    "ddn",
    "deepfool",
    "detector_sweep",
    "fgsm",
    "get_attack",
    "opgd",
    "pgd",
    "qpgd2",
    "qpgd_l2",
    "register_attack",
    "run_attack",
    "scw_l2",
    "transfer_attack",
]
