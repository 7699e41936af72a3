"""twistd plugin: ``twistd deployer``.

Only a lazy ServiceMaker lives here, so that a broken import in the application never hides the
plugin from ``twistd --help``; the options and the service are in :mod:`deployer.tap`.
"""

from twisted.application.service import ServiceMaker

deployer = ServiceMaker(
    "deployer",
    "deployer.tap",
    "Continuous deployment daemon: webhook, etcd watch and Docker engine updates.",
    "deployer",
)
