"""Serving an engine directory behind Triton Inference Server.

The served model is one Triton Python-backend model whose ``execute`` runs the same generation loop
as ``sdexport run`` (``sdexport.runtime``). ``sdexport triton-repo`` writes it as a standard model
repository for the stock ``tritonserver``; ``sdexport serve`` writes the same repository to a
temporary folder and starts it with the ``tritonserver`` binary that PyTriton ships. One model code
path serves both, so what the tests prove about one holds for the other.

Modules, in the order a request meets them:

- ``protocol``: the model's input and output tensors (names, types, defaults), one table read by the
  repository writer, the model, the client helpers and the load test.
- ``requests``: Triton tensors → per-image rows → ``GenerationRequest`` batches, with the CLI's checks.
- ``triton_model``: the Python-backend model (load once, batch compatible rows, per-request errors).
- ``repository``: writes ``config.pbtxt`` and ``1/model.py``.
- ``server``: starts the repository under PyTriton's ``tritonserver``.
- ``client`` and ``loadtest``: ``tritonclient`` calls used by the tests, the README and the load test.
"""
