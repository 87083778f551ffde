"""`python -m sparse_recover ...` (and `accelerate launch -m sparse_recover ...`)."""

from sparse_recover.cli import main

if __name__ == "__main__":
    main()
