from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]
dev = {"pytest", "pytest-timeout", "ruff", "httpx", "selenium"}
runtime = [r for r in requirements if r.split("==")[0] not in dev]

setup(
    name="avatar-launcher",
    version="0.1.0",
    description="Multi-GPU distributed inference launcher for audio-driven talking-avatar video (HunyuanVideo-Avatar)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["avatar", "avatar.*", "launch", "launch.*"]),
    include_package_data=True,
    package_data={"avatar.serve": ["static/*"]},
    install_requires=runtime,
    extras_require={
        "dev": [r for r in requirements if r.split("==")[0] in dev],
        "xdit": ["xfuser==0.7.0", "yunchang==0.6.4"],
    },
    entry_points={
        "console_scripts": [
            "avatar-generate=launch.generate:main",
            "avatar-weights=launch.weights:main",
            "avatar-plan=launch.plan:main",
            "avatar-serve=launch.serve:main",
        ]
    },
)
