"""``python -m swin_ssl.convert import|export|inspect ...``"""
import sys

from swin_ssl.convert.cli import main

sys.exit(main())
