from job.early_stopping import EarlyStopping


def test_stops_after_patience_epochs_without_improvement():
    stopper = EarlyStopping("val_accuracy", patience=2, min_delta=0.01)
    history = [0.50, 0.60, 0.605, 0.61, 0.70]  # 0.605 and 0.61 are within min_delta of 0.60
    improved, stops = [], []
    for epoch, value in enumerate(history):
        improved.append(stopper.update(value, epoch))
        stops.append(stopper.should_stop)
    assert improved == [True, True, False, False, True]
    assert stops == [False, False, False, True, False]
    assert stopper.best == 0.70 and stopper.best_epoch == 4


def test_loss_mode_and_state_round_trip():
    stopper = EarlyStopping("val_loss", patience=1)
    assert stopper.update(1.0, 0) and not stopper.update(1.2, 1) and stopper.should_stop
    clone = EarlyStopping("val_loss", patience=1)
    clone.load_state_dict(stopper.state_dict())
    assert clone.best == 1.0 and clone.best_epoch == 0 and clone.should_stop


def test_patience_zero_never_stops():
    stopper = EarlyStopping("val_accuracy", patience=0)
    for epoch in range(20):
        stopper.update(0.1, epoch)
    assert not stopper.should_stop
