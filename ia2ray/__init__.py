"""ia2ray: IA2 (ICL activation alignment) runs and hyperparameter studies.

Layers (imports go one way): `ia2ray.config` -> `ia2ray.data` -> `ia2ray.core`; entry point
`python -m ia2ray.run`. See README.md.
"""

__version__ = "0.1.0"
