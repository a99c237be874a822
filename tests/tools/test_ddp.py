"""Training under DistributedDataParallel (2 processes, gloo, CPU) makes the update of one
process on the joined batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seq2seq_fast as sf
from seq2seq_fast.tools.tasks import load_date_task
from seq2seq_fast.tools.train import Seq2SeqTrainer

STEPS = 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _task():
    return load_date_task(num_train=40, num_test=2, batch_size=10, num_steps=12, seed=8)


def _model(task):
    torch.manual_seed(0)
    enc = sf.Seq2SeqEncoder(len(task.src_vocab), 6, 10, 2)
    dec = sf.Seq2SeqAttentionDecoder(len(task.tgt_vocab), 6, 10, 2)
    return sf.EncoderDecoder(enc, dec).double()


def _worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        task = _task()
        model = _model(task)
        torch.manual_seed(100 + rank)  # different RNG per rank: the trainer must still agree
        net = torch.nn.parallel.DistributedDataParallel(model)
        trainer = Seq2SeqTrainer(net, bos=task.tgt_vocab["<bos>"], lr=0.01)
        trainer.fit(task.train_iter, max_steps=STEPS, progress=False)
        torch.save(model.state_dict(), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_update_equals_single_process_on_joined_batch(tmp_path):
    out_file = str(tmp_path / "params")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{out_file}.0"), torch.load(f"{out_file}.1")

    task = _task()
    model = _model(task)
    torch.manual_seed(100)
    trainer = Seq2SeqTrainer(model, bos=task.tgt_vocab["<bos>"], lr=0.01)
    initial = {n: v.clone() for n, v in model.state_dict().items()}
    trainer.fit(task.train_iter, max_steps=STEPS, progress=False)
    single = model.state_dict()
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the ranks agree"
        torch.testing.assert_close(rank0[name], value, atol=1e-10, rtol=1e-8, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(single["decoder.dense.weight"], initial["decoder.dense.weight"]), "training ran"


@pytest.mark.slow
def test_cli_train_with_two_processes(tmp_path):
    from seq2seq_fast.tools.checkpoints import load_checkpoint
    from seq2seq_fast.tools.cli import main

    out = tmp_path / "ddp.pt"
    assert main(["train", "--steps", "2", "--num-train", "64", "--num-test", "4", "--batch-size", "16",
                 "--num-hiddens", "8", "--embed-size", "4", "--nproc", "2", "--quiet", "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out)
    assert checkpoint["step"] == 2 and checkpoint["task"] == "dates"
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    assert os.path.getsize(out) > 0
