# The two commands of the README. Both start by installing what they need.
PYTHON ?= python
# the demo's own data folder: real data under data/ is never touched
DEMO_DATA ?= data/sample

.PHONY: demo test

demo:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) make_sample_data.py --out $(DEMO_DATA) --persons 500 --eval-persons 200 --overwrite
	$(PYTHON) train.py --data_dir $(DEMO_DATA)/train --name demo --model BaseModel --resize 96,72 \
		--epochs 25 --batch_size 32 --lr 3e-3 --scheduler cosine --criterion new_focal --patience 0
	$(PYTHON) inference.py --data_dir $(DEMO_DATA)/eval --answers $(DEMO_DATA)/eval/answers.csv --overwrite

test:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pytest
