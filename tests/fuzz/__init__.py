"""Coverage-guided fuzzing harnesses (atheris / libFuzzer), run as modules: see
``tests/fuzz/fuzz_codecs.py``. Not collected by pytest; ``tests/unit/test_fuzz_atheris.py``
runs them for a bounded number of inputs."""
