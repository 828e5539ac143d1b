-- 0002: the audit trail of the vigilance records.
--
-- Every change a person or the service makes to the regulatory records (a version's state,
-- a baseline, ground truth, an alert's acknowledgement, an export) is kept here, in the same
-- transaction as the change itself, so that the trail and the records can never disagree.
-- Rows are never updated or deleted: the trigger refuses it.

CREATE TABLE trail (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL CHECK (actor <> ''),
    action      text NOT NULL CHECK (action ~ '^[a-z]+(\.[a-z_]+)+$'),
    model_id    text,
    version     text,
    study_uid   dicom_uid,
    details     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object')
);
CREATE INDEX trail_by_time ON trail (at);
CREATE INDEX trail_by_model ON trail (model_id, at);
CREATE INDEX trail_by_action ON trail (action, at);

CREATE FUNCTION refuse_trail_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only';
END
$$;

CREATE TRIGGER trail_append_only BEFORE UPDATE OR DELETE ON trail
    FOR EACH ROW EXECUTE FUNCTION refuse_trail_change();
