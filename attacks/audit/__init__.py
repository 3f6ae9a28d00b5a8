"""The audit runner: attacks as a cascade over the samples still robust; every adversarial example
clipped, checked against its threat model, rounded to 8 bits and re-scored through the real
serving path; one JSONL record per (sample, attack, eps), written as it is produced.

Phases, in this order, each over fixed batches of the sample range:

1. ``clean``: every sample through the serving path (prediction, detector score and flag);
2. white-box *minimal* attacks (DDN, BP, C&W, DeepFool) on every correctly classified sample: one
   run gives each sample's distortion, hence the attack's operating characteristic, and the
   per-sample best of them the empirical upper bound on the minimal distortion;
3. white-box *budget* attacks, per norm, eps ascending, in the listed order, each on the samples
   *still robust at that eps*: correct and without a successful record (of any attack so far)
   whose distortion in that norm is <= eps (a valid example at eps is valid at every larger eps);
4. transfer attacks (crafted on the surrogate; the target is not queried), same cascade: whatever
   they break, the white-box attacks had left robust;
5. sanity: an unbounded PGD (L-inf ``sanity_eps``) on a few correct samples; it should break all.

Resume: every batch of a unit (attack, eps) is written as its records followed by one ``commit``
line. A restarted audit keeps the committed batches (a torn or uncommitted tail is dropped), skips
them, and redoes the others with the same seeds, which are derived from (audit seed, attack, eps,
batch): the batches, the cascade and the seeds are the same, so are the records.

Modes (``adaptive``): ``off`` attacks the bare classifier (the twin) and ignores the defenses, the
non-adaptive baseline; ``auto`` attacks the pipeline (BPDA through non-differentiable steps, EOT
over random ones when the pipeline declares or shows randomness, the detector's reject logit when
``detector_aware``); ``on`` is ``auto`` with EOT applied even when no randomness is seen.
"""


from advshield.attacks.audit.attack_models import Scorer, Setup, build_setup
from advshield.attacks.audit.certificate_check import certificate_check
from advshield.attacks.audit.probes import PROBES, gradient_probe, randomness_probe, run_probes
from advshield.attacks.audit.records import (
    EXAMPLES,
    FORMAT,
    RECORDS,
    RecordLog,
    derive_seed,
    load_examples,
    read_records,
    write_json,
)
from advshield.attacks.audit.runner import Auditor, Unit
from advshield.attacks.audit.spec import (
    DEFAULT_ATTACKS,
    RECORD_SETTINGS,
    AttackEntry,
    AuditSpec,
    audit_spec,
    parse_attack,
    replace_spec,
)

__all__ = [
    "DEFAULT_ATTACKS",
    "EXAMPLES",
    "FORMAT",
    "PROBES",
    "RECORDS",
    "RECORD_SETTINGS",
    "AttackEntry",
    "AuditSpec",
    "Auditor",
    "RecordLog",
    "Scorer",
    "Setup",
    "Unit",
    "audit_spec",
    "build_setup",
    "certificate_check",
    "derive_seed",
    "gradient_probe",
    "load_examples",
    "parse_attack",
    "randomness_probe",
    "read_records",
    "replace_spec",
    "run_probes",
    "write_json",
]
