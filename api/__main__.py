"""``python -m api``: serve the API on QUANTFARM_HOST:QUANTFARM_PORT."""

import sys

from api.app import serve
from quantfarm.settings import Settings

if __name__ == "__main__":
    sys.exit(serve(Settings()))
