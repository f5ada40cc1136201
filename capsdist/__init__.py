"""capsdist: Matrix Capsule Networks with EM routing, trained at scale.

Importing capsdist changes nothing in the process (no environment variables, no logging handlers): the launch
scripts set those up through capsdist.core.cli.setup_process.
"""

__version__ = "0.1.0"
