"""Test-time flips (tta.test, evaluate.py --tta): each image's probabilities are the mean of
its and its mirror's softmax, checked against a direct computation."""
import pytest
import torch
from accelerate import Accelerator

from job.loop import evaluate


class LeftRight(torch.nn.Module):
    """Logits from the left and right halves with different weights: not mirror-symmetric."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2 * 4 * 4, 3)
        torch.manual_seed(0)
        torch.nn.init.normal_(self.linear.weight, std=2.0)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_flip_averages_the_softmax_of_each_image_and_its_mirror():
    torch.manual_seed(1)
    batches = [(torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))) for _ in range(4)]
    model, acc = LeftRight(), Accelerator(cpu=True)
    plain = evaluate(model, batches, acc, num_classes=3)
    flipped = evaluate(model, batches, acc, num_classes=3, tta="flip")
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        probs = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        expected_accuracy = (probs.argmax(1) == y).float().mean().item()
        expected_loss = torch.nn.functional.nll_loss(probs.log(), y).item()
        plain_accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert flipped["samples"] == plain["samples"] == 20
    assert flipped["accuracy"] == pytest.approx(expected_accuracy)
    assert plain["accuracy"] == pytest.approx(plain_accuracy)
    assert abs(flipped["loss"] - expected_loss) < 1e-5
    assert flipped["accuracy"] != plain["accuracy"] or flipped["loss"] != plain["loss"]  # the flip did something
