import re
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]
dev = {"pytest", "pytest-timeout", "hypothesis", "ruff", "httpx", "selenium"}

# Data shipped inside the package: the Hydra config groups (configs/ -> avatar/_configs/), the weights manifest
# (weights/ -> avatar/_weights/, manifest and README only), the Slurm templates (launch/slurm/) and the Kubernetes
# example (launch/k8s/). avatar/resources.py and launch/resources.py find them in a checkout and in a wheel alike.
ROOT = Path(__file__).resolve().parent
config_packages = ["avatar._configs"] + sorted(
    "avatar._configs." + ".".join(p.relative_to(ROOT / "configs").parts)
    for p in (ROOT / "configs").rglob("*")
    if p.is_dir() and any(p.glob("*.yaml"))
)
data_packages = [*config_packages, "avatar._weights", "launch.slurm", "launch.k8s"]
runtime = [r for r in requirements if r.split("==")[0] not in dev]

setup(
    name="avatar-launcher",
    version=re.search(r'__version__ = "([^"]+)"', (ROOT / "avatar" / "version.py").read_text()).group(1),
    description="Multi-GPU distributed inference launcher for audio-driven talking-avatar video (HunyuanVideo-Avatar)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["avatar", "avatar.*", "launch", "launch.*"]) + data_packages,
    package_dir={"avatar._configs": "configs", "avatar._weights": "weights"},
    package_data={
        **{name: ["*.yaml"] for name in config_packages},
        "avatar._weights": ["manifest.yaml", "README.md"],
        "launch.slurm": ["*.sbatch", "README.md"],
        "launch.k8s": ["*.yaml", "README.md"],
        "avatar.serve": ["static/*", "migrations/*.sql"],
    },
    include_package_data=False,
    install_requires=runtime,
    extras_require={
        "dev": [r for r in requirements if r.split("==")[0] in dev],
        "xdit": ["xfuser==0.7.0", "yunchang==0.6.4"],
        "sage": ["sageattention==1.0.6"],
    },
    entry_points={
        "console_scripts": [
            "avatar-generate=launch.generate:main",
            "avatar-weights=launch.weights:main",
            "avatar-plan=launch.plan:main",
            "avatar-resources=launch.resources:main",
            "avatar-serve=launch.serve:main",
            "avatar-worker=launch.worker:main",
        ]
    },
)
