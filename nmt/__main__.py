"""`python -m nmt …` and `torchrun -m nmt …` enter the same CLI as the `nmt` command."""

from nmt.cli import main

if __name__ == "__main__":
    main()
