"""Gradio pieces of the app, one module per panel; ``charts`` holds pure functions from statistics to figures."""
