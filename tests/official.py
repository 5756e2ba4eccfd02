"""The authors' released architecture as data (copied under tests/data/official): paths and variant names."""
from pathlib import Path

OFFICIAL = Path(__file__).resolve().parent / 'data' / 'official'

# The authors' variant names in state_dict_shapes.json -> our timm entry points.
VARIANTS = {
    'S_224': 'refiner_vit_s_patch16_224',
    'S_384': 'refiner_vit_s_patch16_384',
    'M_224': 'refiner_vit_m_patch16_224',
    'M_384': 'refiner_vit_m_patch16_384',
    'L_224': 'refiner_vit_l_patch16_224',
    'L_384': 'refiner_vit_l_patch16_384',
    'L_448': 'refiner_vit_l_patch16_448',
}
