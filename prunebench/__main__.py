import sys

from prunebench.commands.main import main

sys.exit(main())
