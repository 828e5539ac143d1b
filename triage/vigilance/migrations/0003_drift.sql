-- 0003: drift detection, volume watch and the life of an alert.
--
-- Baselines are learnt per output label of a version (a model may flag several findings, each
-- with its own expected flag rate); the studies arriving per modality are kept to watch the
-- volume; an alert names what it is about (an output label, or a modality), the period of
-- records that raised it, and the note of whoever acknowledged it; one open alert per subject;
-- and whether each configured webhook has been told.

-- One baseline row per output label; rows of one setting share their period. ``days`` are the
-- UTC days of the period that had studies (the daily flag rates the mean and sigma come from).
ALTER TABLE baselines ADD COLUMN label text CHECK (label <> '');
ALTER TABLE baselines ADD COLUMN days integer CHECK (days >= 0);
DROP INDEX baselines_latest;
CREATE INDEX baselines_latest ON baselines (model_id, version, label, created_at DESC);

-- Studies as they reach the service, whether or not a model analyses them; the volume watch
-- compares the hourly counts of each modality with the same hours of past weeks.
CREATE TABLE arrivals (
    study_uid    dicom_uid PRIMARY KEY,
    modality     text NOT NULL CHECK (modality <> ''),
    received_at  timestamptz NOT NULL
);
CREATE INDEX arrivals_by_modality ON arrivals (modality, received_at);

-- An alert about the arrivals of a modality names no model.
ALTER TABLE alerts ALTER COLUMN model_id DROP NOT NULL;
-- What the alert is about within the model version: an output label (output-cusum,
-- score-ks), a modality (volume); none for input drift, which lists its attributes in detail.
ALTER TABLE alerts ADD COLUMN label text;
-- The records that raised it: [evidence_start, evidence_end). A subject whose alert was
-- acknowledged alerts again only on records after those of its previous alert.
ALTER TABLE alerts ADD COLUMN evidence_start timestamptz;
ALTER TABLE alerts ADD COLUMN evidence_end timestamptz;
ALTER TABLE alerts ADD COLUMN note text;
ALTER TABLE alerts ADD CHECK (model_id IS NOT NULL OR kind = 'volume');
ALTER TABLE alerts ADD CHECK (evidence_end IS NULL OR evidence_end > evidence_start);
-- At most one open alert per subject: checks that run again, or at the same time, add none.
CREATE UNIQUE INDEX alerts_one_open ON alerts (kind, model_id, version, label)
    NULLS NOT DISTINCT WHERE acknowledged_at IS NULL;
CREATE INDEX alerts_by_subject ON alerts (kind, model_id, version, label, raised_at DESC);

-- Each configured webhook's notification of an alert; retried until delivered.
CREATE TABLE alert_notifications (
    alert_id      bigint NOT NULL REFERENCES alerts (id),
    webhook       text NOT NULL,
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    delivered_at  timestamptz,
    last_error    text,
    PRIMARY KEY (alert_id, webhook)
);
CREATE INDEX alert_notifications_pending ON alert_notifications (alert_id)
    WHERE delivered_at IS NULL;
