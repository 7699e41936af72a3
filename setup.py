from setuptools import find_packages, setup
from setuptools.command.editable_wheel import editable_wheel


class EditableWithPlugins(editable_wheel):
    """``pip install -e .`` puts the checkout on sys.path (setuptools' "compat" mode), so that
    twistd finds ``twisted/plugins/deployer_plugin.py``: the default editable mode installs an
    import hook that Twisted's plugin discovery does not look through."""

    def initialize_options(self):
        super().initialize_options()
        self.mode = "compat"


setup(
    name="deployer",
    version="0.1.0",
    description="Continuous deployment daemon for fleets of plain Docker hosts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=[*find_packages(include=["deployer", "deployer.*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["deployer_plugin.py"]},
    install_requires=[
        "twisted>=24.7",
        "klein>=23.5",
        "treq>=23.11",
        "attrs>=23.1",
        "txaioetcd==18.10.2",
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "hypothesis>=6.80",
        ],
        "dev": ["mypy>=1.8", "mypy-zope>=1.0", "ruff>=0.4"],
    },
    cmdclass={"editable_wheel": EditableWithPlugins},
    entry_points={"console_scripts": ["deployer=deployer.__main__:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
