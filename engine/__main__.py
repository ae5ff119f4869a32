import sys

from engine.serving.cli import main

sys.exit(main())
