"""The layer between the modules and the backends: which backend runs a call
(``dispatch``), the checks of d2l's loose inputs (``validation``) and the decoder state with
its cached key projection (``state``). Imports only ``seq2seq_fast.backends``."""
