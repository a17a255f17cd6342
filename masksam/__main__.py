import sys

from masksam.cli import main

sys.exit(main())
