import sys

from trtcal.cli import main

sys.exit(main())
