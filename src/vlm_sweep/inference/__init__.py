"""What happens to a trained model after training: load, generate, score, export.

A library (no argument parsing): ``vlm_sweep.cli`` wraps it in commands and the training
loop calls ``score`` and ``export`` directly. Submodules are imported by name so that
importing this package stays cheap (no torch).
"""
