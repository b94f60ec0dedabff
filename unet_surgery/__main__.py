import sys

from unet_surgery.cli import main

sys.exit(main())
