"""Ready-made batches as a loader for the real training loop: a list with the plan
(dali_pipelines.sampling.EpochPlan) that train_one_epoch reads its position from."""
from dali_pipelines.sampling import EpochPlan, Shard


class BatchList(list):
    def __init__(self, batches, *, rank: int = 0, world_size: int = 1):
        super().__init__(batches)
        size = len(self[0][1])
        self.plan = EpochPlan(size * len(self) * world_size, train=True,
                              shard=Shard(batch_size=size, rank=rank, world_size=world_size))
