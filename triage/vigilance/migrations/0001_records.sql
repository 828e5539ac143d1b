-- 0001: the records of post-market surveillance of the AI models.
--
-- What a model version analysed and concluded, what turned out to be true, which version was
-- in which state when, the baselines performance is judged against, and the alerts raised
-- and who acknowledged them. No patient name, ID or birth date is stored: a study is known by
-- its Study Instance UID (to join with Orthanc), and a patient only by an age band and sex,
-- with the acquisition attributes that define subgroups and input drift.
-- Every time is a timestamptz (an instant; shown in UTC by the service).

-- A DICOM UID (PS3.5 9.1). Digits and dots only, not the stricter rule on leading zeros:
-- studies with such UIDs exist in the wild and must still be counted.
CREATE DOMAIN dicom_uid AS text
    CHECK (length(VALUE) <= 64 AND VALUE ~ '^[0-9]+(\.[0-9]+)*$');

-- A finding as a coded concept, "scheme:value" (e.g. "SCT:233604007").
CREATE DOMAIN finding_code AS text
    CHECK (VALUE ~ '^[A-Za-z0-9_.-]+:.+$');

-- The versions a model has had and the state each is in now; every change of state is kept
-- in model_version_changes.
CREATE TABLE model_versions (
    model_id    text NOT NULL,
    version     text NOT NULL,
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    state       text NOT NULL CHECK (state IN ('shadow', 'active', 'retired')),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text NOT NULL CHECK (changed_by <> ''),
    PRIMARY KEY (model_id, version)
);
-- At most one version of a model decides priorities at a time.
CREATE UNIQUE INDEX model_versions_one_active ON model_versions (model_id)
    WHERE state = 'active';

CREATE TABLE model_version_changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id    text NOT NULL,
    version     text NOT NULL,
    state       text NOT NULL,
    changed_at  timestamptz NOT NULL,
    changed_by  text NOT NULL,
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);
CREATE INDEX model_version_changes_by_model ON model_version_changes (model_id, changed_at);

CREATE FUNCTION record_model_version_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO model_version_changes (model_id, version, state, changed_at, changed_by)
    VALUES (NEW.model_id, NEW.version, NEW.state, NEW.changed_at, NEW.changed_by);
    RETURN NEW;
END
$$;

CREATE TRIGGER model_versions_history AFTER INSERT OR UPDATE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION record_model_version_change();

-- One row per study analysed by a model version (a re-analysis of the study by the same
-- version replaces it), with the acquisition attributes of the series analysed.
CREATE TABLE analyses (
    id                       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_uid                dicom_uid NOT NULL,
    model_id                 text NOT NULL,
    version                  text NOT NULL,
    role                     text NOT NULL CHECK (role IN ('active', 'shadow')),
    analysed_at              timestamptz NOT NULL,
    sr_sop_instance_uid      dicom_uid,          -- the AI result SR; none for a shadow run
    modality                 text,
    manufacturer             text,
    manufacturer_model_name  text,
    station_name             text,
    calling_aet              text,
    institution              text,
    age_band                 text CHECK (age_band ~ '^[0-9]{1,3}(-[0-9]{1,3}|\+)$'),
    sex                      text CHECK (sex IN ('M', 'F', 'O')),
    slice_thickness_mm       double precision CHECK (slice_thickness_mm > 0),
    kvp                      double precision CHECK (kvp > 0),
    pixel_spacing_row_mm     double precision CHECK (pixel_spacing_row_mm > 0),
    pixel_spacing_column_mm  double precision CHECK (pixel_spacing_column_mm > 0),
    reconstruction_kernel    text,
    UNIQUE (study_uid, model_id, version),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);
CREATE INDEX analyses_by_version ON analyses (model_id, version, analysed_at);
CREATE INDEX analyses_by_time ON analyses (analysed_at);

-- Each output label of an analysis: its score, the threshold of the version's manifest and
-- whether the study was flagged (score reaching the threshold).
CREATE TABLE analysis_outputs (
    analysis_id  bigint NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    label        text NOT NULL,
    code         finding_code NOT NULL,
    score        double precision NOT NULL CHECK (score BETWEEN 0 AND 1),
    threshold    double precision NOT NULL CHECK (threshold BETWEEN 0 AND 1),
    flagged      boolean NOT NULL,
    PRIMARY KEY (analysis_id, label),
    CHECK (flagged = (score >= threshold))
);
CREATE INDEX analysis_outputs_by_code ON analysis_outputs (code);

-- What was found in a study, by a radiologist's assessment of an AI result (feedback), the
-- signed report, or later evidence. A human who changes their mind adds a row (the later one
-- counts); importing the same outcome again changes nothing (the unique rule).
CREATE TABLE ground_truth (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_uid            dicom_uid NOT NULL,
    model_id             text,                   -- set when assessing one model's result
    label                text NOT NULL,
    code                 finding_code NOT NULL,
    present              boolean NOT NULL,
    source               text NOT NULL
                         CHECK (source IN ('feedback', 'report', 'pathology', 'follow-up')),
    observer             text NOT NULL CHECK (observer <> ''),  -- user name or source system
    recorded_at          timestamptz NOT NULL,   -- when the observer stated it
    imported_at          timestamptz NOT NULL DEFAULT now(),
    sr_sop_instance_uid  dicom_uid,              -- the assessment SR, where there is one
    UNIQUE NULLS NOT DISTINCT (study_uid, model_id, code, source, observer, recorded_at)
);
CREATE INDEX ground_truth_by_study ON ground_truth (study_uid);
CREATE INDEX ground_truth_by_model ON ground_truth (model_id, recorded_at);

-- The flag rate a version is expected to have, learnt over a period; CUSUM charts judge the
-- daily flag rate against the latest baseline of the version.
CREATE TABLE baselines (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id         text NOT NULL,
    version          text NOT NULL,
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    studies          integer NOT NULL CHECK (studies >= 0),
    flag_rate_mean   double precision NOT NULL CHECK (flag_rate_mean BETWEEN 0 AND 1),
    flag_rate_sigma  double precision NOT NULL CHECK (flag_rate_sigma >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text NOT NULL CHECK (created_by <> ''),
    CHECK (period_end > period_start),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);
CREATE INDEX baselines_latest ON baselines (model_id, version, created_at DESC);

-- Alarms of the surveillance; acknowledging one records who and when, never deletes it.
-- A new kind of alert is a new migration.
CREATE TABLE alerts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('output-cusum', 'score-ks', 'input-drift',
                                                    'volume', 'shadow-agreement')),
    model_id          text NOT NULL,
    version           text,
    detail            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    raised_at         timestamptz NOT NULL DEFAULT now(),
    acknowledged_at   timestamptz,
    acknowledged_by   text,
    CHECK ((acknowledged_at IS NULL) = (acknowledged_by IS NULL)),
    CHECK (acknowledged_at IS NULL OR acknowledged_at >= raised_at)
);
CREATE INDEX alerts_open ON alerts (model_id, raised_at DESC) WHERE acknowledged_at IS NULL;
CREATE INDEX alerts_by_model ON alerts (model_id, version, raised_at DESC);
