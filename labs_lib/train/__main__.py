"""``python -m labs_lib.train``: the GPT trainer (labs_lib.train.gpt)."""

from labs_lib.core.dist import exit_process
from labs_lib.train.gpt import main

main()
exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it
