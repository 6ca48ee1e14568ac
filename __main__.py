"""``python -m negative_prompt_inversion ...`` (and ``accelerate launch -m negative_prompt_inversion ...``): the
``npi-edit`` command line."""

from .cli import main


main()
