"""Scoring with the reference scorers (pycocotools COCOeval, lvis LVISEval) and stratified reports."""
