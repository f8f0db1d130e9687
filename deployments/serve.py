"""Serve oncoflow's deployments from this machine: the same as `oncoflow serve` (see its --help)."""

from flows.cli import serve_command

if __name__ == "__main__":
    import typer

    typer.run(serve_command)
