"""`python -m spp_cli` runs the same CLI as the `spp` console script."""

from spp_cli.cli import main

if __name__ == "__main__":
    main()
