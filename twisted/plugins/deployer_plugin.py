"""twistd plugin: ``twistd deployer``.

Only a lazy ServiceMaker lives here, so that a broken import in the application never hides the
plugin from ``twistd --help``; the options and the service are in :mod:`deployer.tap`.

A usage error (a bad flag or value) is one line on stderr and exit status 2, instead of
twistd's whole help text on stdout and status 1: that is what a supervisor's log should show.
"""

import sys

from twisted.application.service import ServiceMaker
from twisted.python import usage
from twisted.python.reflect import namedAny


class _DeployerServiceMaker(ServiceMaker):
    @property
    def options(self):
        base = namedAny(self.module).Options
        tapname = self.tapname

        class Options(base):
            def parseOptions(self, options=None):
                try:
                    super().parseOptions(options)
                except usage.UsageError as e:
                    sys.stderr.write(
                        f"twistd {tapname}: {e} (twistd {tapname} --help lists the flags)\n"
                    )
                    sys.stderr.flush()
                    raise SystemExit(2) from None

        Options.__name__ = Options.__qualname__ = base.__name__
        Options.__module__ = base.__module__
        return Options


deployer = _DeployerServiceMaker(
    "deployer",
    "deployer.tap",
    "Continuous deployment daemon: webhook, etcd watch and Docker engine updates.",
    "deployer",
)
