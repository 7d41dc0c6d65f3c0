"""One data-parallel rank of the exactly-once test: its loader's rows over one
epoch (``num_workers`` dataloader workers), gathered over gloo to rank 0."""

import hashlib
import json
import sys

import torch.distributed as dist


def main(rank: int, world: int, init_file: str, prefix: str, workers: int, out: str) -> None:
    from torchtitan_nemotron3.data.pretrain import PretrainDataLoader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = PretrainDataLoader.Config(blend=prefix, infinite=False, num_workers=workers,
                                    vocab_size=65536)
    loader = PretrainDataLoader(cfg, dp_world_size=world, dp_rank=rank, tokenizer=None,
                                seq_len=32, local_batch_size=2)
    hashes = []
    for inputs, labels in loader:
        for i in range(labels.shape[0]):
            h = hashlib.sha1()
            for t in (inputs["input"][i], labels[i], inputs["positions"][i]):
                h.update(t.numpy().tobytes())
            hashes.append(h.hexdigest())
    gathered = [None] * world
    dist.all_gather_object(gathered, hashes)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, prefix, workers, out = sys.argv[1:]
    main(int(rank), int(world), init_file, prefix, int(workers), out)
