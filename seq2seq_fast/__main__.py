"""``python -m seq2seq_fast {bench,demo,train,translate}``."""
import sys

from seq2seq_fast.tools.cli import main

sys.exit(main())
