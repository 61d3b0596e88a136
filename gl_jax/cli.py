"""What every command line of gl_jax shares: absl's `app.run` around the command's `main`."""
from absl import app


def run(main) -> None:
    app.run(main)
