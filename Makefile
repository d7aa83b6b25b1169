# Pointsman: `make run` brings up broker, topics, services and a demo; `make test` runs the suite.
# Everything lands under .venv (Python) and .state (Kafka jars, broker data, logs).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KAFKA_PORT ?= 9092
PYTEST_ARGS ?=
export POINTSMAN_HOME := $(CURDIR)

.PHONY: help venv asyncapi-specs train eval bench-model bench-classifier bench-dispatcher services-start services-stop kafka-fetch kafka-start kafka-stop topics run stop test test-soak lint schemas clean

help:
	@echo "make run    - set up, start Kafka on 127.0.0.1:$(KAFKA_PORT), create topics, run the demo"
	@echo "make test   - set up, then the test suite against brokers it starts on free ports"
	@echo "make stop   - stop what make run started"
	@echo "make lint   - ruff and mypy"
	@echo "make schemas- regenerate schemas/ from the event models"
	@echo "make test-soak - the long soak/chaos runs (not in the default suite)"
	@echo "make train  - retrain the classifier model; make eval - rescore it; make bench-model"

$(STAMP): pyproject.toml services/classifier/pyproject.toml services/dispatcher/pyproject.toml services/auditor/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e 'services/classifier[train,eval]' -e 'services/dispatcher[local-llm]' -e services/auditor
	touch $@

venv: $(STAMP)

kafka-fetch: venv
	$(BIN)/pointsman kafka fetch

# The official AsyncAPI JSON Schemas (npm @asyncapi/specs), to validate schemas/asyncapi.yaml.
ASYNCAPI_SPECS_VERSION := 6.11.1
ASYNCAPI_SPECS := .state/asyncapi-specs/$(ASYNCAPI_SPECS_VERSION)/package/schemas/3.0.0.json
$(ASYNCAPI_SPECS):
	mkdir -p $(dir $(ASYNCAPI_SPECS))../..
	cd $(dir $(ASYNCAPI_SPECS))../.. && npm pack --silent @asyncapi/specs@$(ASYNCAPI_SPECS_VERSION) >/dev/null \
		&& tar xzf asyncapi-specs-$(ASYNCAPI_SPECS_VERSION).tgz
asyncapi-specs: $(ASYNCAPI_SPECS)

kafka-start: kafka-fetch
	@$(BIN)/pointsman kafka status >/dev/null 2>&1 && echo "Kafka already running" || \
		$(BIN)/pointsman kafka start --port $(KAFKA_PORT)

kafka-stop:
	@test -x $(BIN)/pointsman && $(BIN)/pointsman kafka stop || true

topics: kafka-start
	POINTSMAN_BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT) $(BIN)/pointsman topics create

# Services run in the background; pid files and logs in .state/run/. The local model server
# (`pointsman local-llm`, 127.0.0.1:$(LLM_PORT)) is what the embedded demo routing file points at.
LLM_PORT ?= 8090
SERVICES := local-llm classifier dispatcher
define start_service
	@if [ -f .state/run/$(1).pid ] && kill -0 $$(cat .state/run/$(1).pid) 2>/dev/null; then \
		echo "$(1) already running"; \
	else \
		POINTSMAN_BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT) nohup $(BIN)/pointsman $(2) \
			> .state/run/$(1).log 2>&1 & echo $$! > .state/run/$(1).pid; \
		echo "$(1) started (log: .state/run/$(1).log$(3))"; \
	fi
endef

services-start: topics
	@mkdir -p .state/run
	$(call start_service,local-llm,local-llm --port $(LLM_PORT),; http://127.0.0.1:$(LLM_PORT)/v1)
	$(call start_service,classifier,classifier --instance-id local-0,; ops: http://127.0.0.1:9400/metrics)
	$(call start_service,dispatcher,dispatcher --instance-id local-0,; ops: http://127.0.0.1:9401/metrics)
	@for i in $$(seq 1 120); do curl -sf http://127.0.0.1:$(LLM_PORT)/v1/models >/dev/null && break; sleep 0.5; done; \
		curl -sf http://127.0.0.1:$(LLM_PORT)/v1/models >/dev/null && echo "local-llm ready" || \
		{ echo "local-llm did not come up: see .state/run/local-llm.log"; exit 1; }

services-stop:
	@for s in $(SERVICES); do \
		if [ -f .state/run/$$s.pid ]; then \
			kill -TERM $$(cat .state/run/$$s.pid) 2>/dev/null || true; \
			while kill -0 $$(cat .state/run/$$s.pid) 2>/dev/null; do sleep 0.2; done; \
			rm -f .state/run/$$s.pid; echo "$$s stopped"; \
		fi; \
	done

run: services-start
	POINTSMAN_BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT) $(BIN)/pointsman demo
	@echo
	@echo "Kafka is running on 127.0.0.1:$(KAFKA_PORT). Try:"
	@echo "  $(BIN)/pointsman ask --text 'how do I appeal a parking ticket?'"
	@echo "  $(BIN)/pointsman route --dry-run < tagged.jsonl   # decisions without calling a model"
	@echo "  $(BIN)/pointsman tail responses      # or: queries, tagged, review, dead_letters"
	@echo "  make stop                            # stops everything make run started"

stop: services-stop kafka-stop

test: kafka-fetch asyncapi-specs
	POINTSMAN_ASYNCAPI_SPEC=$(CURDIR)/$(ASYNCAPI_SPECS) $(BIN)/pytest $(PYTEST_ARGS)

test-soak: kafka-fetch
	$(BIN)/pytest --soak -m soak $(PYTEST_ARGS)

# The classifier model (docs/classifier.md). `make train` rebuilds the packaged artifact from
# ../shared/datasets and data/natural (about 40 min on 2 cores); `make eval` re-scores it on the
# test splits and rewrites docs/model-card.md; `make bench-model` prints and saves its speed.
train: venv
	$(BIN)/pointsman train

eval: venv
	$(BIN)/pointsman eval

bench-model: venv
	$(BIN)/python bench/model.py

# The classifier service on a real broker it starts itself (about 5 minutes).
bench-classifier: kafka-fetch
	$(BIN)/python bench/classifier.py

# The dispatcher on a real broker against a zero-latency fake provider.
bench-dispatcher: kafka-fetch
	$(BIN)/python bench/dispatcher.py

lint: venv
	$(BIN)/ruff check src services tests bench
	$(BIN)/ruff format --check src services tests bench
	$(BIN)/mypy

schemas: venv
	$(BIN)/pointsman schemas export

clean: stop
	rm -rf .state
