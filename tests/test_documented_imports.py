"""`import refiner_vit` alone reaches the subpackages the README uses (`refiner_vit.data...`, `refiner_vit.train...`,
`refiner_vit.analysis...`), in a fresh process, and `refiner --help` still starts without torch."""
import subprocess
import sys

import pytest

DOCUMENTED = [
    'refiner_vit.data.token_labels.build_token_label_dataset',
    'refiner_vit.data.token_labels.TokenLabelMixup',
    'refiner_vit.train.token_label_loss.TokenLabelCriterion',
    'refiner_vit.analysis.mean_distance',
    'refiner_vit.analysis.head_similarity',
    'refiner_vit.analysis.layer_similarity',
    'refiner_vit.analysis.entropy',
    'refiner_vit.attention_maps',
    'refiner_vit.fuse_for_inference',
]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout


def test_documented_names_after_import_refiner_vit():
    code = 'import refiner_vit\n' + ''.join(f'assert callable({name}), {name!r}\n' for name in DOCUMENTED)
    _run(code)


@pytest.mark.parametrize('name', ['nothing', 'data.nothing'])
def test_unknown_names_are_attribute_errors(name):
    import refiner_vit  # noqa: F401  (the expression below needs it)

    with pytest.raises(AttributeError, match='nothing'):
        eval(f'refiner_vit.{name}')


def test_help_starts_without_torch():
    out = _run('import sys\nfrom refiner_vit.cli import build_parser\nbuild_parser().format_help()\n'
               "print('torch' in sys.modules, 'timm' in sys.modules)")
    assert out.split() == ['False', 'False']
