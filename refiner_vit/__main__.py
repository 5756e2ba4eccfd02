"""``python -m refiner_vit`` (also what ``torchrun -m refiner_vit`` runs)."""
from .cli import main

raise SystemExit(main())
