"""torch.export and ONNX export of fused models: dynamic batch and parity with the eager model."""
import timm
import torch
from safetensors.torch import save_file

import refiner_vit
from refiner_vit.cli import main as refiner_cli
from refiner_vit.deployment import export_onnx, export_program, onnx_outputs, relative_error

# Small configs of the two families (full S-size export is in benchmarks/export_check.py, not in the suite)
REFINER_ARGS = dict(depth=2)
DEIT_ARGS = dict(img_size=32, patch_size=8, depth=2)


def _eager_and_input(name: str, kwargs: dict, batch: int = 3):
    model = timm.create_model(name, **kwargs).eval()
    size = kwargs.get('img_size', model.pretrained_cfg['input_size'][-1])
    return model, torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_torch_export_has_a_dynamic_batch_and_matches_eager():
    for name, kwargs in (('test_refiner_vit', REFINER_ARGS), ('refined_deit_tiny_patch16_224', DEIT_ARGS)):
        model, x = _eager_and_input(name, kwargs)
        program = export_program(refiner_vit.fuse_for_inference(model), x[:2])
        with torch.no_grad():
            for batch in (1, 3):
                error = relative_error(program.module()(x[:batch]), model(x[:batch]))
                assert error <= 1e-5, (name, batch, error)


def test_onnx_export_runs_in_onnxruntime_with_another_batch(tmp_path):
    model, x = _eager_and_input('refined_deit_tiny_patch16_224', DEIT_ARGS)
    path = tmp_path / 'deit.onnx'
    export_onnx(refiner_vit.fuse_for_inference(model), x[:2], path)
    with torch.no_grad():
        assert relative_error(onnx_outputs(path, x), model(x)) <= 1e-4


def test_export_command_onnx_and_pt2_from_a_checkpoint(tmp_path, capsys):
    model, x = _eager_and_input('test_refiner_vit', REFINER_ARGS)
    save_file(model.state_dict(), tmp_path / 'w.safetensors')
    args = ['--model', 'test_refiner_vit', '--model-kwargs', 'depth=2',
            '--checkpoint', str(tmp_path / 'w.safetensors')]
    assert refiner_cli(['export', *args, '--output', str(tmp_path / 'r.onnx')]) == 0
    assert refiner_cli(['export', *args, '--output', str(tmp_path / 'r.pt2')]) == 0
    out = capsys.readouterr().out
    assert 'ONNX: wrote' in out and 'torch.export: wrote' in out
    with torch.no_grad():
        ref = model(x)
        assert relative_error(torch.export.load(tmp_path / 'r.pt2').module()(x), ref) <= 1e-5
    assert relative_error(onnx_outputs(tmp_path / 'r.onnx', x), ref) <= 1e-4


def test_export_command_names_bad_input(tmp_path, capsys):
    assert refiner_cli(['export', '--model', 'test_refiner_vit', '--output', str(tmp_path / 'r.zip')]) == 2
    assert '.onnx' in capsys.readouterr().err
    missing = tmp_path / 'missing.safetensors'
    assert refiner_cli(['export', '--model', 'test_refiner_vit', '--checkpoint', str(missing),
                        '--output', str(tmp_path / 'r.pt2')]) == 2
    assert 'missing.safetensors' in capsys.readouterr().err
