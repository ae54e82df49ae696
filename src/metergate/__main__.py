"""`python -m metergate`: the same command line as the `metergate` script."""

from metergate.cli import main

if __name__ == "__main__":
    main(prog_name="metergate")
