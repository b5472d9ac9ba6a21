"""Tools around the checkpoint's code, never copied into a checkpoint.

* `cli`: ``python -m zip2zip_hf compress`` / ``demo``; `report`: the text reports they share;
* `demo`: the end-to-end demo on SmolLM2-135M; `smollm2`: the real SmolLM2 files, offline;
* `visualize`: hypertokens coloured in a terminal or HTML, compression statistics.
"""
