import sys

from fp8_turbo.engine.serving.cli import main

sys.exit(main())
