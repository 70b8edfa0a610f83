"""``python -m labs_lib.export``: a run to the Hugging Face GPT-2 format or to ONNX (labs_lib.inference.export)."""

from labs_lib.inference.export import main

if __name__ == "__main__":
    main()
