"""``python -m labs_lib.generate``: text from a trained run (labs_lib.inference.generate; see its docstring)."""

from labs_lib.inference.generate import main

if __name__ == "__main__":
    main()
