"""advshield: defenses, adaptive audits and certification for deployed image classifiers.

The repository's folders are installed as sub-packages of this namespace:
``advshield.plugin`` (serving edge), ``advshield.defenses``, ``advshield.attacks``,
``advshield.deploy``.
"""

__version__ = "0.1.0"
