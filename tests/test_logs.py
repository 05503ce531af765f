import logging

from core.logs import setup_logging


def test_only_rank_zero_logs_progress_and_every_rank_logs_warnings(capsys):
    log = logging.getLogger("trainer.some_stage")
    setup_logging(rank=1)
    log.info("progress on rank 1")
    log.warning("trouble on rank 1")
    setup_logging(rank=0)
    log.info("progress on rank 0")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["WARNING trainer.some_stage: trouble on rank 1",
                                                         "INFO trainer.some_stage: progress on rank 0"]
